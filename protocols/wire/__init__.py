"""Wire format of secure-fl: protobuf messages (``v1``) and tensor (de)serialisation (``serde``).

Tensors travel as a `Manifest` (name, dtype and shape of
every tensor, total size and SHA-256) followed by the raw little-endian bytes in chunks; nothing is
ever pickled, so a malicious peer can at worst send a payload that is refused.
"""
