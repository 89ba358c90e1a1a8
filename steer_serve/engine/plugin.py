"""``vllm.general_plugins`` entry point: runs in every vLLM process before a model is built."""

#: vLLM releases whose internals the engine package was written against (model runner's
#: ``_prepare_inputs`` and ``input_batch``, stock model classes and module names, CPU LoRA ops).
SUPPORTED_VLLM = ("0.32.",)


def check_vllm_version() -> None:
    """Refuse to start on a vLLM release the engine package was not written for."""
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"steer-serve supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; "
                           f"found {vllm.__version__} (see steer_serve/engine/ for what to re-check)")


def register() -> None:
    """Register the steerable architectures (lazily imported) and fix vLLM's CPU LoRA ops."""
    from vllm import ModelRegistry

    from steer_serve.engine.architectures import ARCHITECTURES, steer_class_name
    from steer_serve.engine.cpu_lora_fix import patch_cpu_lora_ops

    check_vllm_version()
    for architecture in ARCHITECTURES:
        name = steer_class_name(architecture)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"steer_serve.engine.model:{name}")
    patch_cpu_lora_ops()
