"""The chunk store: committed chunk outputs under OUT/chunks/<content key>/, on any fsspec URL.

CONTRACT (implementation pending):

    OUT/chunks/<key>/<attempt>/frames.mkv          frames, FFV1 (lossless) in Matroska, gbrp
    OUT/chunks/<key>/<attempt>/latents.safetensors final latents, when the backend returns them
    OUT/chunks/<key>/<attempt>/chunk.json          sidecar: seed, timings, worker, versions
    OUT/chunks/<key>/COMMIT.json                   written last, in one PUT: attempt id,
                                                   sha256 and size of every file, frame count
    OUT/identities/<key>.safetensors               identity bundles

Object stores have no atomic rename, so each attempt writes under its own unique folder
and the chunk is committed by one small PUT of COMMIT.json. A reader trusts only what
COMMIT.json names and checks sizes and sha256; a chunk without a valid commit is absent.
"""
