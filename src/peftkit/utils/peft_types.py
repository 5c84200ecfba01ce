"""`peft.utils.peft_types`: the method and task enums and method registration."""

from ..config import PeftType, TaskType
from ..registry import register_peft_method

__all__ = ["PeftType", "TaskType", "register_peft_method"]
