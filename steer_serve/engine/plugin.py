"""``vllm.general_plugins`` entry point: runs in every vLLM process before a model is built."""


def register() -> None:
    """Register the steerable architectures (lazily imported) and fix vLLM's CPU LoRA ops."""
    from steer_serve.engine import vllm_internals   # checks the vLLM version on import
    from steer_serve.engine.architectures import ARCHITECTURES, steer_class_name

    for architecture in ARCHITECTURES:
        name = steer_class_name(architecture)
        vllm_internals.register_model(name, f"steer_serve.engine.model:{name}")
    vllm_internals.patch_cpu_lora_ops()
