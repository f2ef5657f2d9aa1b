"""`navil.serving`: NaViL in inference engines. `core` holds what every engine needs and imports none; `vllm` is the
vLLM model and plugin (the `vllm.general_plugins` entry point `navil = navil.serving.vllm:register`)."""
