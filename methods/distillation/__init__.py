"""Knowledge distillation (distill) and the depth-reduced student it starts from (layer-drop)."""
