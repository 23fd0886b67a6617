"""Executors: the only modules that change anything outside the state file.

``files`` (staging and renames into the prearchive), ``db`` (psycopg INSERTs into XNAT's
``xdat_search.prearchive``), ``xnat`` (the REST client: build, archive, verify, revert), ``dicom``
(C-STORE) and ``apply`` (walks a saved plan). Heavy drivers are imported here only.
"""
