"""The ONNX export folder's format (`vclr export --format onnx`): its files and manifest. The writer
(vclr.export.onnx) and the reader (vclr.search.onnx) both take the layout from here; nothing here imports torch.

- `text.onnx`: token ids (B, L) int64 -> (B, D) unit vectors; `image.onnx`: pixels (B, 3, S, S) float32, normalised
  -> (B, D) unit vectors; the batch is dynamic;
- `tokenizer.json`: the model's tokenizer for Hugging Face `tokenizers`, padding and truncating to L;
- `export.json`: `format_version`, the text cleaning, the image preprocessing (size, resize mode, interpolation, mean,
  std), the model's identity (name, config hash, dimension), `precision` ("fp32", or "int8" for quantised towers;
  absent in exports made before int8: fp32), the cosine against PyTorch measured at export, and every file's checksum.
"""

MANIFEST = "export.json"
FORMAT_VERSION = 1  # bumped when a file or a manifest field changes meaning; readers refuse other versions
TEXT_FILE, IMAGE_FILE, TOKENIZER_FILE = "text.onnx", "image.onnx", "tokenizer.json"
RESIZE_MODES = ("shortest", "squash")  # open_clip's eval resize modes reproduced here ("longest" pads: not yet)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
