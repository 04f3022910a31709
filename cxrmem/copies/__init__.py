"""Evidence of copying: generations of flagged prompts against the training images.

Pure domain code, bottom layer (no storage, no run layout, no Ray, no config tree):

- `images`: read PNG / JPG / DICOM bytes to grey float32 in [0, 1]; list a training-image source
  (a folder's files, the MIMIC-CXR-JPG layout, or a table) as an image table with the ids that
  link an image to the report its prompt came from;
- `embedders`: `pixel`, `rad_dino` and any transformers vision model in a Hugging Face cache,
  each with a fingerprint that keys a stored index;
- `index`: embed image files in parts a resumable job stores, and stack the parts for search;
- `search`: exact cosine top-k with chunked matrix products, memory-bounded;
- `generation`: N decoded generations of prompts at a guidance, through Scorer methods only;
- `evidence`: per-prompt similarity, threshold calibration on controls, re-identification,
  and the `copies.parquet` schema;
- `find`: one guidance of the check, the pieces above in order (what a `copies` stage calls).
"""
