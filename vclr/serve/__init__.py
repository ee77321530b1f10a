"""The search service: a JSON API and a web page over one index.

Owns the FastAPI app, its routes and access guards (`app`), the query engine that batches, caches, bounds and
times out queries and swaps in new saves of the index (`engine`), and the page as static files (`static/`).

May import: vclr.errors, vclr.index, vclr.search, vclr.data.images. Never vclr.train or Accelerate; with the ONNX
backend, never torch.
"""
