"""Input/output: readers (shards -> rows), image decoding, and the Parquet sink with manifest and atomic commit.

    from pgbatch.io import readers, decode, sink
    shards = readers.list_shards("gs://b/shards/*.tar", "webdataset")
    rows = readers.read_shard(shards[0], "webdataset")        # list of row dicts, one per sample
    batch = decode.decode_batch(columns, size=224)           # + pixels [B, 224, 224, 3], width, height, sha256
    sink.Sink("gs://b/out/", schema).commit_shard(shards[0].id, table, {"seconds": 12.3})
"""
