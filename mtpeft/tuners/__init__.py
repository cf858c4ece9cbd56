"""The shared PEFT methods: one module per method (settings, layer, injection rule, export names),
selected by ``peft.method`` through ``registry.make_tuner``; ``family`` maps target names onto each
backbone family, ``base`` holds what every method provides."""
