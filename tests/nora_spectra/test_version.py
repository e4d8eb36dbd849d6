"""The version written into analyses is the installed package's version."""

from importlib.metadata import version

from nora_spectra._text import package_version


def test_package_version_is_the_installed_distributions():
    assert package_version() == version("nora-spectra")
