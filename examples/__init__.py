"""Example user models, imported by name: ``--model examples.cifar_resnet:resnet110`` (run from
the repository root). A regular package, so that an ``examples`` directory some other installed
distribution ships cannot shadow it."""
