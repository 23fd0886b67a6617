-- xdat_search.prearchive as XNAT 1.8.2 and later create it.
--
-- Source: xnat-web (NrgXnat/xnat, web/ subtree)
--   src/main/java/org/nrg/xnat/helpers/prearchive/DatabaseSession.java  (the column enum: order, type, canBeNull)
--   src/main/java/org/nrg/xnat/helpers/prearchive/PrearcDatabase.java   (createTableSql() iterates the enum
--     and appends the constraint)
--   schema name: PoolDBUtils.search_schema_name = "xdat_search" (libs/xdat)
-- The UNIQUE constraint comes from commit 9f344ec8e "XNAT-6717: add uniqueness constraint": absent from
-- the 1.8.1 release, present in 1.8.2 (a5d7e9b21); columns unchanged through 1.8.9.2 (f91b45f2e).
-- See the project's XNAT reference (xnat-reference.md), section 1.
--
-- Faithful on purpose: unquoted identifiers (PostgreSQL folds folderName, SOURCE, ... to lower case),
-- VARCHAR without length, TIMESTAMP without time zone, NOT NULL only where the enum says canBeNull=false,
-- no primary key, no defaults. NULLs are distinct in PostgreSQL, so the constraint does not cover
-- Unassigned rows (project IS NULL).
CREATE SCHEMA IF NOT EXISTS xdat_search;

CREATE TABLE xdat_search.prearchive (
  project VARCHAR,
  timestamp VARCHAR NOT NULL,
  lastmod TIMESTAMP,
  uploaded TIMESTAMP,
  scan_date TIMESTAMP,
  scan_time VARCHAR,
  subject VARCHAR,
  folderName VARCHAR NOT NULL,
  name VARCHAR,
  tag VARCHAR,
  status VARCHAR NOT NULL,
  url VARCHAR NOT NULL,
  autoarchive VARCHAR,
  prevent_anon BOOL,
  prevent_auto_commit BOOL,
  SOURCE VARCHAR,
  VISIT VARCHAR,
  PROTOCOL VARCHAR,
  TIMEZONE VARCHAR,
  CONSTRAINT prearchive_study UNIQUE (timestamp, project, folderName)
);
