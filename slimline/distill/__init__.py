"""Knowledge distillation into smaller students."""
