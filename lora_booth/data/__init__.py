"""Photos, captions, kohya folders, masks, buckets, crops and deterministic batches."""
