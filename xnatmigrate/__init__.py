"""xnatmigrate: declarative, resumable migration of DICOM collections into XNAT."""

__version__ = "0.1.0"
