"""The codec users run: the .pcv2 bitstream and compress / decompress."""
