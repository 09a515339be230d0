"""Readers that turn files into :class:`~medfoundry.data.sample.ImageSet` splits."""
