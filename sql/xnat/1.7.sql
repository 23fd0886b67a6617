-- xdat_search.prearchive as XNAT 1.6.x, 1.7.x and 1.8.0-1.8.1 create it.
--
-- Source: xnat-web (NrgXnat/xnat, web/ subtree)
--   src/main/java/org/nrg/xnat/helpers/prearchive/DatabaseSession.java  (the column enum: order, type, canBeNull)
--   src/main/java/org/nrg/xnat/helpers/prearchive/PrearcDatabase.java   (createTableSql() iterates the enum)
--   schema name: PoolDBUtils.search_schema_name = "xdat_search" (libs/xdat)
-- Checked at release commits 1.7.0=385657fcd, 1.7.6=879a1c11e, 1.8.0=465f2cb67; 1.6 via
-- gift-surg/GiftCloudServerBuilder. See the project's XNAT reference (xnat-reference.md), section 1.
--
-- Faithful on purpose: unquoted identifiers (PostgreSQL folds folderName, SOURCE, ... to lower case),
-- VARCHAR without length, TIMESTAMP without time zone, NOT NULL only where the enum says canBeNull=false,
-- no primary key, no defaults, and NO unique constraint (it arrived in 1.8.2, see 1.8.2.sql).
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
  TIMEZONE VARCHAR
);
