"""One file per PEFT method; importing this package registers them all."""

from . import (
    adalora,  # noqa: F401
    boft,  # noqa: F401
    ia3,  # noqa: F401
    ln_tuning,  # noqa: F401
    loha,  # noqa: F401
    lokr,  # noqa: F401
    lora,  # noqa: F401
    oft,  # noqa: F401
    p_tuning,  # noqa: F401
    prefix_tuning,  # noqa: F401
    prompt_tuning,  # noqa: F401
    trainable_tokens,  # noqa: F401
    vera,  # noqa: F401
)
