"""A hospital's PACS as a site's data source (`medfed data pull`): query a cohort over
DICOMweb or DIMSE, retrieve its image series into a site folder that training, `data
check` and `node start` read unchanged, and keep patient identifiers at the site."""
