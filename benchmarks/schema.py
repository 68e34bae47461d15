"""The generated app's 30-table schema and its seed data, as plain data.

One spec renders both the SQLAlchemy models and the Alembic revisions (so they cannot disagree), and
the seed formulas live here too so the generated tests can assert exact counts of seeded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

# table  Class  column:type[:flag]...   types: strN text int num bool ts fk=table; flags: unique null
_SPEC = """
1 countries        Country         code:str2:unique name:str80
1 currencies       Currency        code:str3:unique name:str80
1 users            User            email:str255:unique name:str100 country_id:fk=countries:null created_at:ts
1 profiles         Profile         user_id:fk=users:unique bio:text:null website:str200:null
1 addresses        Address         user_id:fk=users line1:str200 city:str100 country_id:fk=countries
1 organizations    Organization    slug:str80:unique name:str120 created_at:ts
1 roles            Role            name:str50:unique
1 permissions      Permission      code:str80:unique
1 role_permissions RolePermission  role_id:fk=roles permission_id:fk=permissions
1 memberships      Membership      user_id:fk=users organization_id:fk=organizations role_id:fk=roles
2 categories       Category        slug:str80:unique name:str120 parent_id:fk=categories:null
2 brands           Brand           name:str120:unique
2 products         Product         sku:str40:unique name:str200 category_id:fk=categories brand_id:fk=brands price:num
2 variants         Variant         product_id:fk=products sku:str60:unique size:str20:null
2 tags             Tag             name:str50:unique
2 product_tags     ProductTag      product_id:fk=products tag_id:fk=tags
2 warehouses       Warehouse       code:str20:unique country_id:fk=countries
2 stock_items      StockItem       product_id:fk=products warehouse_id:fk=warehouses quantity:int
2 price_lists      PriceList       name:str80:unique currency_id:fk=currencies
2 prices           Price           price_list_id:fk=price_lists product_id:fk=products amount:num
3 carts            Cart            user_id:fk=users created_at:ts
3 cart_items       CartItem        cart_id:fk=carts product_id:fk=products quantity:int
3 orders           Order           number:str40:unique user_id:fk=users status:str20 total:num created_at:ts
3 order_items      OrderItem       order_id:fk=orders product_id:fk=products quantity:int unit_price:num
3 payments         Payment         order_id:fk=orders amount:num provider:str40 reference:str80:unique
3 shipments        Shipment        order_id:fk=orders warehouse_id:fk=warehouses tracking:str80:unique:null
3 refunds          Refund          payment_id:fk=payments amount:num reason:text:null
3 coupons          Coupon          code:str40:unique percent:int active:bool
3 reviews          Review          product_id:fk=products user_id:fk=users rating:int body:text:null
3 audit_log        AuditLog        actor_id:fk=users:null action:str80 payload:text:null created_at:ts
"""

REVISIONS = {1: "accounts", 2: "catalog", 3: "orders", 4: "flags and indexes", 5: "seed data"}
LATE_COLUMNS = {"users": "is_active:bool", "products": "listed:bool"}  # added by revision 4
LATE_INDEXES = {"ix_orders_user_created": ("orders", ("user_id", "created_at")),
                "ix_reviews_product": ("reviews", ("product_id",))}

# Seed: how many rows of each reference table (about 1,100 rows in all).
SEED = {"countries": 50, "currencies": 10, "roles": 5, "permissions": 20, "role_permissions": 30,
        "categories": 40, "brands": 30, "products": 300, "tags": 40, "product_tags": 300,
        "warehouses": 10, "stock_items": 300, "price_lists": 3, "coupons": 20}
ROLES = ("admin", "editor", "viewer", "billing", "support")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # str, text, int, num, bool, ts, fk
    length: int = 0
    target: str = ""  # fk target table
    unique: bool = False
    nullable: bool = False


@dataclass(frozen=True)
class Table:
    revision: int
    name: str
    cls: str
    columns: tuple[Column, ...]


def parse_column(token: str) -> Column:
    name, kind, *flags = token.split(":")
    length, target = 0, ""
    if kind.startswith("str"):
        kind, length = "str", int(kind[3:])
    elif kind.startswith("fk="):
        kind, target = "fk", kind[3:]
    return Column(name, kind, length, target, "unique" in flags, "null" in flags)


def tables() -> list[Table]:
    out = []
    for line in _SPEC.strip().splitlines():
        revision, name, cls, *columns = line.split()
        out.append(Table(int(revision), name, cls, tuple(parse_column(c) for c in columns)))
    return out


# -- seed formulas (the generated seed module and the tests' expected values both come from these) ----------
def product_category(index: int) -> int:
    """Category id (1-based) of the product with 0-based ``index``."""
    return index % SEED["categories"] + 1


def products_in_category(category_id: int) -> int:
    return sum(1 for i in range(SEED["products"]) if product_category(i) == category_id)


def coupon_active(index: int) -> bool:
    return index % 3 != 0


def active_seed_coupons() -> int:
    return sum(1 for i in range(SEED["coupons"]) if coupon_active(i))


def country_code(index: int) -> str:
    """Two-letter code of the country with 0-based ``index``."""
    return chr(65 + index // 26) + chr(65 + index % 26)
