"""Test helpers: the float64 reference (``reference``), one driver per backend and input framework
(``harness``), the Keras and optax case modules run in their own processes (``keras_*``,
``optax_stock_tests``), and the ahead-of-time GPU compilation reports (``gpu_resources``)."""
