//! The PostgreSQL server the tests share (`WXRELAY_TEST_POSTGRES_URL`), as
//! relays started from a configuration file reach it: a schema of the test's
//! own, dropped when the test ends, and the `[spool]` keys that name it.

use wxrelay::spool::postgres::testing;

pub use testing::TEST_URL_VAR;

pub struct Database {
    pub url: url::Url,
    pub schema: testing::TestSchema,
}

impl Database {
    /// A fresh schema; `None`, after one line saying so, when no server is
    /// configured. A server that is configured but cannot be reached fails
    /// the test.
    pub fn create() -> Option<Database> {
        let url = testing::test_url()?;
        let schema = testing::TestSchema::new(&url);
        // Fails here, not later in a relay's log, when the server is away.
        schema.execute("SELECT 1");
        let url = url::Url::parse(&url).unwrap_or_else(|e| panic!("{TEST_URL_VAR}: {e}"));
        Some(Database { url, schema })
    }

    pub fn name(&self) -> &str {
        &self.schema.settings.schema
    }

    /// The `[spool]` keys of a relay on this schema.
    pub fn spool_toml(&self) -> String {
        self.spool_toml_at(self.url.as_str())
    }

    /// As [`Database::spool_toml`], reaching the server at `url` (through a
    /// proxy).
    pub fn spool_toml_at(&self, url: &str) -> String {
        format!(
            "backend = \"postgres\"\nurl = \"{url}\"\nschema = \"{}\"\npool_size = 4\nsslmode = \"disable\"\n",
            self.name()
        )
    }

    /// A connection to the server, to look at the schema's tables.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(self.url.as_str(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("{TEST_URL_VAR}: {e}"));
        tokio::spawn(connection);
        client
    }
}
