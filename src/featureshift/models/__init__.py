from .zoo import (ModelInfo, attach_info, available_models, build, create_model, current_num_classes,
                  imagenet_classes, model_info, replace_head)
from .layers import LayerInfo, list_layers, resolve_layers, trace_layers

__all__ = ["ModelInfo", "attach_info", "available_models", "build", "create_model", "current_num_classes",
           "imagenet_classes", "model_info", "replace_head", "LayerInfo", "list_layers", "resolve_layers",
           "trace_layers"]
