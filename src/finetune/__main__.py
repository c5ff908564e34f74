"""`python -m finetune`: the CLI, also as torchrun runs it (`torchrun ... -m finetune train CONFIG`)."""

from finetune.cli import main_exit

main_exit()
