"""Model construction: config → transformers class on meta → operators swapped in → weights streamed."""
