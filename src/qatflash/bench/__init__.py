"""`qatflash-bench`: latency and peak memory of models without training, each point in a fresh process."""
