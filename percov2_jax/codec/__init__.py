"""The codec users run: images <-> ``.pcv2`` byte strings.

Modules: `api` (`Codec`: compress / decompress), `bitstream` (the ``.pcv2`` container),
`token_payload` (a token map <-> its payload in every entropy mode, hybrid included) and
`networks` (the jitted encoder and decoder networks).
"""
