"""Does the float merge hold on the example model zoo (``hdrq_examples.zoo``)? ``float_merge_check``
evaluates θ0, each fine-tuned θt and the float merges (all targets and every pair, with and without
folding BatchNorm first) on every target of a benchmark recipe, with the harmonic mean over the
targets each model serves; it is how the zoo's training recipe was chosen. Run from the repository
root with ``python -m benchmarks.zoo.float_merge_check [--recipe demo|tiny] [--split val|test]``
(choose recipes on ``val``, report on ``test``); it prints one table.
"""
