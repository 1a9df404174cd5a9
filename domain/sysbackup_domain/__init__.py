"""Plain-Python domain of s3-sysbackup: hashes, chunking, packs, trees, manifests, retention.

No AWS calls here: the backend and the host uploader both build on these modules, and everything that
parses untrusted bytes or JSON validates strictly (InvalidDocument / CorruptBlob from `errors`).
"""
