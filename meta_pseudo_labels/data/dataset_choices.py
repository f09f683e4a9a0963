"""What `config.dataset` chooses from: where the examples come from and how they are augmented.

`data_sources.py` reads each source and `augment.py` builds each kind of views; both run on TensorFlow. The names
live here, apart from them, so that checking a config (`config_validation`, and through it `compile_check`) needs
no TensorFlow.
"""

SOURCES = ('tfds', 'folder', 'npz', 'idx', 'digits', 'two_moons')   # data_sources.load_in_memory; 'tfds' can also stream
AUGMENTATIONS = ('cifar', 'digits', 'imagenet', 'none')     # augment.weak_view / strong_view / eval_view `kind`
LABELED_VIEWS = ('weak', 'strong')                           # input_pipeline: the labeled images' view
