"""Evaluating NaViL with the harnesses VLM papers use (docs/evaluation.md).

- `navil.evaluation.lmms_eval_navil`: the `navil` model of lmms-eval (`pip install navil[eval]`, then
  `lmms-eval --model navil --model_args pretrained=DIR`), registered through lmms-eval's `lmms_eval.models` entry
  point;
- `navil.evaluation.vlmevalkit.NaViLChat`: a VLMEvalKit model with the paper's per-benchmark prompts;
- `navil.evaluation.engine.NaViLEvalModel`: the model both use, replying as `model.chat`.

Importing this package imports neither harness.
"""


def lmms_eval_model_manifest():
    """lmms-eval's registration of the `navil` model (the `lmms_eval.models` entry point in setup.py); called by
    lmms-eval at start-up, so lmms-eval is importable here."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="navil", simple_class_path="navil.evaluation.lmms_eval_navil.NaViL")
