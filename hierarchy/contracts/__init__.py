"""The contracts every stage shares, and nothing that belongs to one stage.

Each module here is the one definition of something two or more stages (or a stage and its
users) agree on: the dataset folder and its schemas, the model store and how a saved model is
loaded and fed, the predictions and curation tables, the taxonomy, the configuration, the
errors a user acts on, and storage (every path and atomic write). Nothing in this package
imports a stage (``tests/test_architecture.py`` runs the import-linter contracts that say so).
"""
