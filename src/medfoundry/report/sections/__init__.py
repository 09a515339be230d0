"""Report sections: each is a function from a context to an HTML fragment rendered from its own template.

A new section is one module here plus its template under ``templates/sections/``, and one entry in the
section lists of :mod:`medfoundry.report.html`.
"""
