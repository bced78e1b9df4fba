"""Data for SFT: preference datasets (hh, shp, se, local jsonl) are read into canonical records by
`data.records.load_records`, then tokenized into truncated prompt/response examples and batched in a seeded order."""
