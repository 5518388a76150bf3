"""difftune: fine-tuning diffusion models on diffusers, accelerate and peft."""

import logging
import time

# when this process started difftune (before the slow imports): a run's wall time counts from here
STARTED = time.monotonic()


class _DropBitsandbytesKernelNotice(logging.Filter):
    """bitsandbytes logs a WARNING on every CPU with AVX512-BF16 when the optional `kernels` package (a Hub download
    of a 4-bit gemm) is absent, even when nothing 4-bit is used; diffusers imports bitsandbytes through its quantizer
    support, so every run would print it. Only that notice is dropped: any other bitsandbytes message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelNotice())


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers 5 warns that `CLIPImageProcessor` (and others) "requires torchvision" and falls back to the PIL
    processor whenever a pipeline's feature extractor is looked up; difftune installs no torchvision on purpose (see
    requirements) and the PIL processor is what it wants, so that notice is dropped; other messages still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
