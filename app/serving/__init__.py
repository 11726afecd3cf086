"""The serving core: the Service and what it drives (decode pool, micro-batcher, predictor,
embedding store). Never imports the api, the app factory or the trainer."""
