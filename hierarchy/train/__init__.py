"""Training: tf.data input from Petastorm, Keras models, the Horovod loop."""
