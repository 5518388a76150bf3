"""The parts of `finetune.evaluate` (which keeps the command line and re-exports every name below):

* `metrics` — Fréchet distance and KID against a fixed reference set; `DigitsEvaluator` on the digits classifier.
* `inception` — a plain-torch Inception-v3 up to pool3, its weights from a local file; `InceptionEvaluator`.
* `sampling` — sampling a pipeline into a tensor; reading a folder of images into one.
* `scores` — putting it together: evaluate a pipeline, a saved pipeline folder or two image folders.
* `report` — the text table and the flat logs of a result, each figure next to its real-vs-real baseline.
"""
