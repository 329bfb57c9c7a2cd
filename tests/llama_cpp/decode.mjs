// llama.cpp (node-llama-cpp's prebuilt CPU binaries) reading one GGUF file: greedy
// continuations of prompts given as TOKEN IDS, and per-token log-probabilities of a
// token sequence. tests/unit/models/test_llama_cpp.py compares both with gmt-mlx's own MLX decode.
//
//   node decode.mjs MODEL.gguf REQUEST.json   ->   one JSON object on stdout
//
// REQUEST: {"prompts": [[id, ...], ...], "max_tokens": N, "score": [id, ...], "n_vocab": V}
// OUTPUT:  {"greedy": [[id, ...], ...], "logprobs": [float, ...], "eog": [id, ...]}
//   greedy:   up to N tokens per prompt at temperature 0, ending early after an
//             end-of-generation token (model.isEogToken, which the token is included);
//   logprobs: log p(score[i + 1] | score[..i]) from llama.cpp's raw logits, i = 0..len-2
//             (logit - max logit - log(sum exp(logit - max logit)));
//   eog:      the ids llama.cpp counts as end of generation (of 0..V-1).
//
// Token ids, not text: the string API does not parse special tokens by default, and
// the comparison is of the weights, not of two tokenizers.
//
// node-llama-cpp is looked up in $GMT_MLX_NODE_LLAMA_CPP (a node_modules folder) when
// set, else in this folder's node_modules (`npm install` here, as .ci/run does).

import {readFileSync} from "node:fs";
import {dirname, join} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const [modelPath, requestPath] = process.argv.slice(2);
if (!modelPath || !requestPath) {
    console.error("usage: node decode.mjs MODEL.gguf REQUEST.json");
    process.exit(2);
}
const request = JSON.parse(readFileSync(requestPath, "utf8"));
const modules = process.env.GMT_MLX_NODE_LLAMA_CPP || join(dirname(fileURLToPath(import.meta.url)), "node_modules");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(join(modules, "node-llama-cpp", "dist", "index.js")).href);

const llama = await getLlama({gpu: false, build: "never", usePrebuiltBinaries: true, progressLogs: false,
                              logLevel: LlamaLogLevel.error, maxThreads: 2});
const model = await llama.loadModel({modelPath, gpuLayers: 0, useMmap: false});
const longest = Math.max(request.score?.length ?? 0,
                         ...(request.prompts ?? []).map((p) => p.length + (request.max_tokens ?? 0)));
const contextSize = Math.max(64, Math.min(model.trainContextSize, 2 ** Math.ceil(Math.log2(longest + 8))));
// A float32 KV cache (llama.cpp's default is F16): the file's encoding is then the only rounding.
const context = await model.createContext({contextSize, batchSize: contextSize, threads: 1, flashAttention: false,
                                           experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"});
const sequence = context.getSequence();

const greedy = [];
for (const prompt of request.prompts ?? []) {
    await sequence.clearHistory();
    const out = [];
    if ((request.max_tokens ?? 0) > 0) {
        for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
            out.push(token);
            if (model.isEogToken(token) || out.length >= request.max_tokens) break;
        }
    }
    greedy.push(out);
}

const logprobs = [];
const score = request.score ?? [];
if (score.length > 1) {
    await sequence.clearHistory();
    // Greedy (temperature 0) leaves llama.cpp's logits as they are, the whole vocabulary, and
    // selects the largest: includeSelected returns the max logit (includeMax does not add it).
    const items = score.slice(0, -1).map((token, i) => [token, {generateNext: {
        logits: {filter: {tokens: [score[i + 1]], includeSelected: true}}, totalLogitWeight: true,
        options: {temperature: 0}}}]);
    const results = await sequence.controlledEvaluate(items);
    for (let i = 0; i < items.length; i++) {
        const next = results[i]?.next;
        if (!next?.logits || next.totalLogitWeight === undefined)
            throw new Error(`no logits from llama.cpp at position ${i}`);
        const max = Math.max(...next.logits.values());
        logprobs.push(next.logits.get(score[i + 1]) - max - Math.log(next.totalLogitWeight));
    }
}

const eog = [];
for (let id = 0; id < (request.n_vocab ?? 0); id++)
    if (model.isEogToken(id)) eog.push(id);

process.stdout.write(JSON.stringify({greedy, logprobs, eog}) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
