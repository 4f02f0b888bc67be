"""The examples: datasets bundled with scikit-learn, NNX models, the CIFAR-10
loader and the demo (needs ``pip install "kwng_jax[examples]"``).

``import kwng_jax`` does not import this package.
"""
