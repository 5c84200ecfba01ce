"""One file per PEFT method; importing this package registers them all."""

from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import ln_tuning  # noqa: F401
from . import vera  # noqa: F401
from . import loha  # noqa: F401
from . import lokr  # noqa: F401
from . import adalora  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import p_tuning  # noqa: F401
from . import oft  # noqa: F401
from . import boft  # noqa: F401
