"""difftune: fine-tuning diffusion models on diffusers, accelerate and peft."""

import logging


class _DropBitsandbytesKernelNotice(logging.Filter):
    """bitsandbytes logs a WARNING on every CPU with AVX512-BF16 when the optional `kernels` package (a Hub download
    of a 4-bit gemm) is absent, even when nothing 4-bit is used; diffusers imports bitsandbytes through its quantizer
    support, so every run would print it. Only that notice is dropped: any other bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelNotice())
