"""``vllm.general_plugins`` entry point: runs in every vLLM process before a model is built."""


def register() -> None:
    """Register the steerable architectures (lazily imported) and fix vLLM's CPU LoRA ops."""
    from vllm import ModelRegistry

    from steer_serve.engine.config import STEERABLE_ARCHITECTURES
    from steer_serve.engine.cpu_lora_fix import patch_cpu_lora_ops

    for arch in STEERABLE_ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"steer_serve.engine.model:{arch}")
    patch_cpu_lora_ops()
