"""Models: timm by name, tiny registered configs, the frozen teacher and the student adapter."""
from vitdistill.models import involution  # noqa: F401  registers rednet_micro_inv with timm
from vitdistill.models.factory import TINY_MODELS, create_model, load_weights, model_spec, read_state_dict
from vitdistill.models.wrappers import InputPrep, Teacher, has_dist_token, prepare_student, student_outputs

__all__ = [
    "TINY_MODELS", "create_model", "load_weights", "model_spec", "read_state_dict",
    "InputPrep", "Teacher", "has_dist_token", "prepare_student", "student_outputs",
]
