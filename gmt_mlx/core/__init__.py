"""The algorithm: masks (pure functions), the masked optimizer, losses, the compiled step and loop, distributed helpers.

Imports only run/ and the bottom layer; never data/ or models/.
"""
