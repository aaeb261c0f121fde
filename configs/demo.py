"""`make demo`, stage 1: train the tiny PerCoV2 on the photographs shipped with scikit-image for
at most 5 minutes (configs/prior_demo.py then trains the prior), checkpoint it, and write a grid
of originals and reconstructions.

  python demos/end_to_end.py --config configs/demo.py --workdir /tmp/percov2_demo
  python demos/end_to_end.py --config configs/demo.py --workdir /tmp/d --config.train.max_minutes=2

The model is configs/tiny.py (no pretrained weights: hashed words stand in for the text
encoders) with one change: the SD3 VAE's stand-in is the small convolutional autoencoder of
models/conv_autoencoder.py (``vae.kind = "lapped_conv"``), fitted on the photos before training
starts (about half a minute on two cores; stored in WORKDIR/conv_autoencoder.npz), whose decoded
images are smooth where the tiny configs' PCA patch codec draws 8x8 blocks. Expect blurry
reconstructions that keep the layout and colours of each photo; real quality needs converted
SD3 weights and real training.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.vae.kind = "lapped_conv"
    c.vae.fit_steps = 1000  # Adam steps of the stand-in's fit (models/conv_autoencoder.py)
    c.train.num_steps = 3000  # the cosine schedule ends here; max_minutes usually stops first
    # 5 minutes, not 6: the stand-in's fit takes about one of the demo's ten.
    c.train.max_minutes = 5.0
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.train.image_every = 500
    return c
