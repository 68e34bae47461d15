"""An app whose startup fills app.state and request state: without its lifespan, /health fails."""

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import settings
from app.deps import get_db
from app.models import Item, User


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.started = True
    yield {"greeting": "ready"}
    app.state.started = False


app = FastAPI(lifespan=lifespan)


class ItemIn(BaseModel):
    title: str


@app.get("/health")
def health(request: Request) -> dict[str, object]:
    return {"started": request.app.state.started, "greeting": request.state.greeting}


@app.post("/items", status_code=201)
def create_item(item: ItemIn, db: Annotated[Session, Depends(get_db)]) -> dict[str, object]:
    owner = db.scalars(select(User).where(User.email == settings.FIRST_SUPERUSER)).one()
    row = Item(title=item.title, owner_id=owner.id)
    db.add(row)
    db.commit()
    return {"id": row.id, "title": row.title}


@app.get("/items")
def list_items(db: Annotated[Session, Depends(get_db)]) -> dict[str, object]:
    titles = db.scalars(select(Item.title).order_by(Item.id)).all()
    return {"count": db.scalar(select(func.count()).select_from(Item)), "titles": list(titles)}
