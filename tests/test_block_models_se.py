"""The squeeze-and-excitation block models end to end (the other blocks: ``test_block_models.py``):
convert -> HDRQ calibrate -> merge two fine-tuned copies -> export (INT8 container and true INT4)
-> onnxruntime, with 100 % top-1 agreement."""

from block_model_pipeline import SE_BLOCKS, end_to_end_checks

(exported, test_every_se_block_exports_and_onnxruntime_agrees_on_every_top1,
 test_in_the_int8_container_every_se_conv_and_linear_runs_on_integer_kernels) = end_to_end_checks(SE_BLOCKS, "block-models-se")
