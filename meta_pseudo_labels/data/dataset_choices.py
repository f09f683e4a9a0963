"""What `config.dataset` chooses from: where the examples come from and how they are augmented.

`data_sources.py` reads each source (TFDS through TensorFlow) and `augment.py` builds each kind of views. The names
live here, apart from the sources, so that checking a config (`config_validation`, and through it `compile_check`)
needs no TensorFlow.
"""

SOURCES = ('tfds', 'folder', 'npz', 'idx', 'digits', 'two_moons')   # data_sources.load_in_memory; tfds also streams
AUGMENTATIONS = ('cifar', 'digits', 'imagenet', 'none')   # augment.weak_view / strong_view / eval_view `kind`
LABELED_VIEWS = ('weak', 'strong')                         # input_pipeline: the labeled images' view
